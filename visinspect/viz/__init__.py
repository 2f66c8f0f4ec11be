"""What a person looks at: matplotlib figures (`plots`) and the notebooks' sliders (`widgets`)."""
