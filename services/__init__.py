"""The four bgm services; each folder is deployable on its own."""
