from mnist_ldm.commands import check_params
from mnist_ldm.runtime.command import main
main(check_params)
