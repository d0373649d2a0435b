"""The built-in real model (SmolLM2-135M) and real text (the King James Bible), both offline."""
