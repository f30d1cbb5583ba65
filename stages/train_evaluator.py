from mnist_ldm.commands import train_evaluator
from mnist_ldm.runtime.command import main
main(train_evaluator)
