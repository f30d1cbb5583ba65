"""Where and how a command computes: device, precision, threads, memory, progress bars."""
