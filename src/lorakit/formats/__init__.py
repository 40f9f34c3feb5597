"""lorakit.formats"""
