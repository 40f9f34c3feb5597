"""lorakit.generate"""
