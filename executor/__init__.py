"""Run plans on real devices with torch.distributed and measure them (see `execute --help`)."""
