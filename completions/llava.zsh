#compdef llava

_llava_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _LLAVA_COMPLETE=complete_zsh llava)
}

compdef _llava_completion llava
