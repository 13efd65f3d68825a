"""How blocks of queries are executed: `local` (this process) -- the journal is the same for every engine."""
