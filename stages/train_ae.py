from mnist_ldm.commands import train_ae
from mnist_ldm.runtime.command import main
main(train_ae)
