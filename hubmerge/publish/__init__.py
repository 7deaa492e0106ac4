"""The output: the folder and its file names, the lock, the model card, and the push to the Hub."""
