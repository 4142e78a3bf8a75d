"""One module per `llava` command; each is thin: parse, one call into the core, render."""
