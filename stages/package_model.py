from mnist_ldm.commands import package_model
from mnist_ldm.runtime.command import main
main(package_model)
