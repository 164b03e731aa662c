"""What people run: the command line and the commands built on the pipeline (predict, compare,
grid, bench, checkpoint tools). Nothing imports from here except the console script."""
