"""The artifact store: manifest, project paths, atomic files and checksums, Arrow shards, safetensors weights."""
