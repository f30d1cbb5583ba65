from mnist_ldm.commands import encode
from mnist_ldm.runtime.command import main
main(encode)
