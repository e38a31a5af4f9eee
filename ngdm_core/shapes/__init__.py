"""The pack's own small world with ground truth: a procedural data set, its model, training, edits and demo.

It is a wing above the methods: it imports them, they never import it.
"""
