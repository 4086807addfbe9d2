"""Two-party vertical federated training (vanilla VFL, FedBCD, CELU-VFL) over TCP with mutual TLS 1.3.

keys.py (the job CA and the parties' certificates), channel.py (framed, typed, checked messages; reconnect;
clear stops), workset.py (CELU-VFL's cache rules), party.py (the two training loops), checkpoint.py (per-party
checkpoints and resume), cli.py (`execute vfl keys|run|local`).
"""
