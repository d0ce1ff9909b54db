"""allspark.serving"""
