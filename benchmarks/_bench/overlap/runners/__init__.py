"""One module per family of variants; each run_* takes the rank's Ctx and returns
that rank's figures for one variant (plain data: they are gathered on rank 0)."""
