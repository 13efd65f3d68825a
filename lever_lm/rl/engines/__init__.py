"""How blocks of queries are executed: `local` (this process) or `ray` (Ray actors on many GPUs and
machines). The unit of work (`lever_lm.rl.blocks.BlockScorer`) and the journal are the same for
every engine; `ray` is imported only when chosen (Ray is an optional extra)."""
