"""The `tradeoff` command: the one entry point, above every package. It imports each command's module only when
that command runs, so `tradeoff generate` loads no dashboard and `tradeoff --help` loads no model code."""

import os

# torch's OpenMP threads spin while idle by default. The dashboard shares two cores between the engine, ASR,
# VAD and the UI, and spinning threads then stall each other (measured: GEMMs 10-100x slower under load);
# passive waiting costs little when the machine is quiet. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
