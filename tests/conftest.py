import torch

# The tests' models are tiny: a second thread buys little, and on a shared 2-core machine torch's
# default (one thread per core) contends with other jobs and has made single tests ten times slower.
torch.set_num_threads(1)
