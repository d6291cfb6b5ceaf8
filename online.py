"""``python online.py``: the command ``tgd_jax.pet.commands.online`` from a source checkout
(installed: ``tgd-online``, or ``python -m tgd_jax.pet.commands.online``).
"""

from tgd_jax.pet.commands import online as _command

__doc__ = _command.__doc__  # noqa: A001  (absl's --help prints the command's own text)
main = _command.main

if __name__ == "__main__":
    _command.run()
