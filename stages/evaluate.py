from mnist_ldm.commands import evaluate
from mnist_ldm.runtime.command import main
main(evaluate)
