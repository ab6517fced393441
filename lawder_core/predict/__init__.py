"""Segment new data with a trained run: 2-D images (`images`), CT volumes (`volumes`), and the output folder
they share (`output`)."""
