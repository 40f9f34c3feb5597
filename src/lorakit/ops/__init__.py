"""lorakit.ops"""
