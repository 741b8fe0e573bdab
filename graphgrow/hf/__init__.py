"""Hugging Face ``transformers`` models and checkpoint directories: capture (torch.export), config rewriting,
width and depth growth, streaming checkpoint IO.  Imported only when a PreTrainedModel or a checkpoint
directory is given; the rest of graphgrow never imports transformers."""
