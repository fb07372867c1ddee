"""Using a trained model: load a checkpoint, sample text from it."""

from slm.generate.model_io import load_model
from slm.generate.sampling import StreamDecoder, generate_ids, sample_next
from slm.generate.text import generate_text

__all__ = ["StreamDecoder", "generate_ids", "generate_text", "load_model", "sample_next"]
