from mnist_ldm.commands import train_diffusion
from mnist_ldm.runtime.command import main
main(train_diffusion)
