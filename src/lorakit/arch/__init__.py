"""lorakit.arch"""
