from mnist_ldm.commands import sample
from mnist_ldm.runtime.command import main
main(sample)
