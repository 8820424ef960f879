"""students"""
