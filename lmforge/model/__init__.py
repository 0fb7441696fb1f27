"""The decoder and what is made of it (attention, loss, generation, export): plain torch, knows
nothing of training, tracking or distribution."""
