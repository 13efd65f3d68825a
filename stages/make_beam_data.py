"""DVC stage: the demo's beam data from the demo data set and its embeddings (see lever_lm.demo.beam_data)."""

from lever_lm.demo.beam_data import main

if __name__ == "__main__":
    main()
