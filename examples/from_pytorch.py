"""A PyTorch model, ``nn.RNN`` followed by ``nn.Linear``, rebuilt in Flax with jaxrnn.

The PyTorch model applies the linear layer to every step of the RNN's output. Its weights are
imported with `jaxrnn.interop.from_torch` into a Flax module holding a jaxrnn layer and an
``nn.Dense``; the script prints the largest difference between the two models' outputs.

Run: ``python examples/from_pytorch.py``
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

import jaxrnn
from jaxrnn import interop
from jaxrnn.flax import linen as jnn


class TorchRNNModel(torch.nn.Module):
    """``nn.RNN(input_size, hidden_size)`` then ``nn.Linear(hidden_size, output_size)``."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.rnn = torch.nn.RNN(input_size, hidden_size)
        self.linear = torch.nn.Linear(hidden_size, output_size)

    def forward(self, x):  # x: (time, batch, input_size), PyTorch's default layout
        out, _ = self.rnn(x)
        return self.linear(out)


class FlaxRNNModel(nn.Module):
    """The same model in Flax: a jaxrnn layer (time-major, as the PyTorch one) and a Dense."""

    net: jaxrnn.Network
    output_size: int

    @nn.compact
    def __call__(self, x):
        y = jnn.RNN(self.net, time_major=True)(x)
        return nn.Dense(self.output_size)(y)


def import_model(torch_model: TorchRNNModel):
    """Returns the Flax model and its variables, holding the PyTorch model's weights."""
    net, rnn_params = interop.from_torch(torch_model.rnn)
    linear = torch_model.linear
    variables = {
        "params": {
            "RNN_0": jnn.to_flax_params(net, rnn_params),
            "Dense_0": {
                "kernel": jnp.asarray(linear.weight.detach().numpy().T),
                "bias": jnp.asarray(linear.bias.detach().numpy()),
            },
        }
    }
    return FlaxRNNModel(net, linear.out_features), variables


def main(input_size: int = 4, hidden_size: int = 16, output_size: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    torch_model = TorchRNNModel(input_size, hidden_size, output_size).eval()
    x = torch.randn(12, 5, input_size)  # (time, batch, features)
    with torch.no_grad():
        expected = torch_model(x).numpy()

    flax_model, variables = import_model(torch_model)
    actual = np.asarray(flax_model.apply(variables, jnp.asarray(x.numpy())))
    diff = float(np.max(np.abs(actual - expected)))
    print(f"output shape {actual.shape}; max |flax - torch| = {diff:.3e}")
    return diff


if __name__ == "__main__":
    main()
