from mnist_ldm.commands import prepare
from mnist_ldm.runtime.command import main
main(prepare)
