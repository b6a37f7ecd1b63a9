"""lfm2-audio: a fast, checkpoint-compatible runtime for LFM2-Audio speech-to-speech models."""

from .config import LFM2AudioConfig
from .errors import InputError
from .generation.chat import Conversation
from .generation.generate import Event, generate
from .generation.sampling import Sampling
from .model.lfm2_audio import LFM2AudioModel
from .pipeline import LFM2Audio

__all__ = ["LFM2Audio", "LFM2AudioModel", "LFM2AudioConfig", "Conversation", "Event", "Sampling", "generate", "InputError"]
__version__ = "0.1.0"
