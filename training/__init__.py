"""Image2Prompt pretraining and MOS fine-tuning (see issue 7)."""
