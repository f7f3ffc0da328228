"""Evaluation of compressed models against their teacher."""
