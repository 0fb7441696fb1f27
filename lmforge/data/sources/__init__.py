"""Where documents come from: the built-in corpus, files (local or fsspec URLs) and the Hugging
Face Hub, each format read into text."""
