"""InfoScore beam data: the lineage's upstream data generation (`generate_data.py`) as a stage of this pipeline.

- `search`: the beam search by InfoScore over a query's pool;
- `probability`: P(y | S, q) through a VQA backend's teacher-forced reply likelihood;
- `records`: the beam JSON entry and the schema the journal checks;
- `generate`: the job (inputs, fingerprint, block runner) on the RL generator's machinery;
- `cli`: the command line (`python -m lever_lm.infoscore.cli`, stage `beam_data`).
"""
