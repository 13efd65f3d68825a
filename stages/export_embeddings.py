"""DVC stage: CLIP embeddings of the training split (see lever_lm.models.v3.export_embeddings)."""

from lever_lm.models.v3.export_embeddings import main

if __name__ == "__main__":
    main()
