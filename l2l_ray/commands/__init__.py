"""The command-line layer below ``l2l_ray.cli``: what a subcommand does with its parsed arguments.

    l2l_ray.commands.data       l2l data synth / l2l data stats [--check-images]
    l2l_ray.commands.evaluate   l2l eval --run DIR (``evaluate_run``)

Layers: cli -> commands -> driver / tune / experiment -> train -> data, model, selection, priors,
records, config. The lower layers never import this package, ``l2l_ray.cli`` or the driver
(tests/test_layers.py checks it); their errors come from ``l2l_ray.errors``.
"""
