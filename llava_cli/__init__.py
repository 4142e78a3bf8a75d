"""llava-cli: run LLaVA-family vision-language models locally."""

__version__ = "0.1.0"
