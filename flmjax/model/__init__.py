from flmjax.model.flm import FLMAudio, Output, abstract, create
