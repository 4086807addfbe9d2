"""Credentials of a VFL job: a job CA and one certificate per party, made with the `openssl` command.

`make_keys(out)` writes one folder per holder, so that handing a party its folder hands it nothing else:

    out/ca/ca.crt, ca.key                       the job's certificate authority (ca.key stays with whoever admits
                                                parties; no party needs it)
    out/active/ca.crt, active.crt, active.key    the active party (CN=vfl-active), signed by the CA
    out/passive/ca.crt, passive.crt, passive.key the passive party (CN=vfl-passive), signed by the CA

`--certs` takes a party's folder or `out` itself (the party's subfolder is used). Private keys are created mode
0600 (O_CREAT|O_EXCL with that mode: never readable by others, even for a moment). Keys are EC P-256; certificates
allow both TLS server and client use, since either party may listen. The channel accepts a peer only if its
certificate chains to this CA and names the other party (see `channel.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hwmodel.errors import UserError

PARTIES = ("active", "passive")
# Where make_keys puts each file, relative to its folder.
FILES = (
    "ca/ca.crt",
    "ca/ca.key",
    "active/ca.crt",
    "active/active.crt",
    "active/active.key",
    "passive/ca.crt",
    "passive/passive.crt",
    "passive/passive.key",
)


def common_name(party: str) -> str:
    """The certificate subject CN of a party."""
    return f"vfl-{party}"


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise UserError(
            "the `openssl` command is needed to make certificates; install OpenSSL (e.g. apt-get install openssl)"
        )
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def make_keys(out: str | Path, days: int = 30, force: bool = False) -> list[Path]:
    """Make the CA and both parties' certificates in `out`; returns the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    existing = [name for name in FILES if (out / name).exists()]
    if existing and not force:
        raise UserError(
            f"{out} already holds {', '.join(existing)}; choose another folder or pass --force to replace them"
        )
    if days < 1:
        raise UserError(f"--days must be at least 1, got {days}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfl-keys-") as tmp:
        work = Path(tmp)
        ext = work / "party.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=work)
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            str(days),
            "-subj",
            "/CN=hetplan-vfl-job-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.crt",
            cwd=work,
        )
        for party in PARTIES:
            _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{party}.key", cwd=work)
            _openssl(
                "req",
                "-new",
                "-key",
                f"{party}.key",
                "-subj",
                f"/CN={common_name(party)}",
                "-out",
                f"{party}.csr",
                cwd=work,
            )
            _openssl(
                "x509",
                "-req",
                "-in",
                f"{party}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                str(days),
                "-sha256",
                "-extfile",
                "party.ext",
                "-out",
                f"{party}.crt",
                cwd=work,
            )
        written = []
        for name in FILES:
            target = out / name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            _write_new(target, (work / Path(name).name).read_bytes(), 0o600 if name.endswith(".key") else 0o644)
            written.append(target)
    return written


def _write_new(target: Path, data: bytes, mode: int) -> None:
    """Write a file that has `mode` from its creation (O_CREAT|O_EXCL): a private key is never readable by
    others, not even for the moment between a default-mode create and a chmod. (--force removes the old one.)"""
    if target.exists():
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(target, mode)  # the umask may have narrowed `mode`; this only restores what was asked


def party_files(certs: str | Path, party: str) -> tuple[Path, Path, Path]:
    """(ca.crt, PARTY.crt, PARTY.key) in `certs` (a party's folder, or the folder make_keys wrote: then its
    PARTY subfolder), checked to exist."""
    certs = Path(certs)
    if (certs / party).is_dir():
        certs = certs / party
    files = (certs / "ca.crt", certs / f"{party}.crt", certs / f"{party}.key")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UserError(
            f"--certs {certs}: missing {', '.join(missing)}; make them with `execute vfl keys --out {certs}`"
        )
    return files
