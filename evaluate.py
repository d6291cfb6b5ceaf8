"""``python evaluate.py``: the command ``tgd_jax.pet.commands.evaluate`` from a source checkout
(installed: ``tgd-evaluate``, or ``python -m tgd_jax.pet.commands.evaluate``).
"""

from tgd_jax.pet.commands import evaluate as _command

__doc__ = _command.__doc__  # noqa: A001  (absl's --help prints the command's own text)
main = _command.main

if __name__ == "__main__":
    _command.run()
