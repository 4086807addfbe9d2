"""AUC cost of the VFL label-leakage defence (`execute vfl run --grad-noise S`, issue 20): both parties of
vfl-wdl-tiny trained in this process over loopback TLS, for each noise scale, final test AUC.

    PYTHONPATH=. python benchmarks/vfl_label_defence.py --noise 0 0.5 1 2
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading

from executor.vfl.keys import make_keys
from executor.vfl.party import PartyConfig, run_party
from workloads import vfl as wl


def final_auc(certs: str, noise: float, workload: str, epochs: int) -> float:
    cfg = wl.load_vfl_workload(workload)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results: dict = {}

    def go(party: str, **kw) -> None:
        results[party] = run_party(
            PartyConfig(party=party, workload=cfg, certs=certs, mode="vanilla", epochs=epochs, **kw)
        )

    active = threading.Thread(target=go, args=("active",), kwargs={"listen": ("127.0.0.1", port), "grad_noise": noise})
    active.start()
    go("passive", connect=("127.0.0.1", port))
    active.join()
    value = results["active"].final_auc
    assert value is not None
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--workload", default="vfl-wdl-tiny")
    parser.add_argument("--epochs", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfl-defence-") as certs:
        make_keys(certs)
        base = None
        print("| --grad-noise | final test AUC | AUC cost |\n|---|---|---|")
        for noise in opts.noise:
            value = final_auc(certs, noise, opts.workload, opts.epochs)
            base = value if base is None else base
            print(f"| {noise:g} | {value:.4f} | {base - value:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
