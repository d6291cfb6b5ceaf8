"""``python reproduce.py``: the command ``tgd_jax.pet.commands.reproduce`` from a source checkout
(installed: ``tgd-reproduce``, or ``python -m tgd_jax.pet.commands.reproduce``).
"""

from tgd_jax.pet.commands import reproduce as _command

__doc__ = _command.__doc__  # noqa: A001  (absl's --help prints the command's own text)
main = _command.main

if __name__ == "__main__":
    _command.run()
