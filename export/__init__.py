"""toolkit.export"""
