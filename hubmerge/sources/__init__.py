"""The sources: model references resolved to revisions and files, fetched or read by range; safetensors I/O; the disk budget."""
