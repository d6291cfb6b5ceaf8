"""``python denoise.py``: the command ``tgd_jax.pet.commands.denoise`` from a source checkout
(installed: ``tgd-denoise``, or ``python -m tgd_jax.pet.commands.denoise``).
"""

from tgd_jax.pet.commands import denoise as _command

__doc__ = _command.__doc__  # noqa: A001  (absl's --help prints the command's own text)
main = _command.main

if __name__ == "__main__":
    _command.run()
