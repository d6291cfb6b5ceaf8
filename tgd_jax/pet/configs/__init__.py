"""The commands' default configs, one ``get_config(preset)`` file per training command
(``--config=<this folder>/train.py:demo``): shipped inside the package, so an installed
``tgd-train`` finds them; ``--config=train.py:demo`` names them from anywhere."""
